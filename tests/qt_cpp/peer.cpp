// The C++ side of tests/test_qt_interop.py: a Qt program using QSharedMemory with the
// key form every Qt version has, QSharedMemory("key") (Qt's legacy key, System V on Linux).
//   peer create KEY SIZE   create, lock, write stage 1 and a message; wait for stage 2; print what came back
//   peer attach KEY        attach, lock, print the message, answer with stage 2
//   peer die KEY           attach, lock, print "locked", and die holding the lock
#include <QCoreApplication>
#include <QDeadlineTimer>
#include <QSharedMemory>
#include <QThread>
#include <cstdio>
#include <cstring>
#include <unistd.h>

static int fail(QSharedMemory &m, const char *what)
{
    std::printf("FAIL %s: %s\n", what, qPrintable(m.errorString()));
    return 1;
}

static int stage(QSharedMemory &m)
{
    m.lock();
    int s = static_cast<const unsigned char *>(m.constData())[0];
    m.unlock();
    return s;
}

int main(int argc, char **argv)
{
    QCoreApplication app(argc, argv);
    if (argc < 3)
        return 2;
    const QString op = QString::fromLocal8Bit(argv[1]);
    QSharedMemory m(QString::fromLocal8Bit(argv[2]));
    if (op == "create") {
        if (!m.create(argc > 3 ? std::atoi(argv[3]) : 4096))
            return fail(m, "create");
        m.lock();
        char *p = static_cast<char *>(m.data());
        std::memcpy(p + 1, "written by C++..", 16);
        p[0] = 1;
        m.unlock();
        std::printf("ready %s\n", qPrintable(m.nativeKey()));
        std::fflush(stdout);
        QDeadlineTimer deadline(20000);
        while (stage(m) != 2) {
            if (deadline.hasExpired())
                return fail(m, "waiting for stage 2");
            QThread::msleep(5);
        }
        m.lock();
        std::printf("got %.16s\n", static_cast<const char *>(m.constData()) + 1);
        m.unlock();
        return m.detach() ? 0 : fail(m, "detach");
    }
    if (!m.attach())
        return fail(m, "attach");
    if (!m.lock())
        return fail(m, "lock");
    char *p = static_cast<char *>(m.data());
    if (op == "die") {
        std::printf("locked\n");
        std::fflush(stdout);
        _exit(0);
    }
    std::printf("got %.16s stage %d size %lld\n", p + 1, p[0], static_cast<long long>(m.size()));
    std::memcpy(p + 1, "answered by C++.", 16);
    p[0] = 2;
    m.unlock();
    return m.detach() ? 0 : fail(m, "detach");
}
